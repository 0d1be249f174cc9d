// Refresh the rollout page's live section (checks, bounds, gates) every 5 seconds.
// Served as a file: the console's Content-Security-Policy allows no inline script.
(function () {
  const live = document.getElementById("live");
  if (!live) return;
  async function refresh() {
    try {
      const response = await fetch(live.dataset.src, { credentials: "same-origin" });
      if (response.ok) live.innerHTML = await response.text();
    } catch (e) {
      /* the console is restarting: try again next time */
    }
  }
  setInterval(refresh, 5000);
})();
