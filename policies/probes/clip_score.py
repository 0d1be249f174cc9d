"""Prompt adherence: CLIP score (100 x cosine of text and image embeddings), optional.

Runs only when the policy names a local CLIP model directory (`clip_model`);
otherwise the scorer logs once that it is skipped.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


class ClipScorer:
    def __init__(self, path: str | Path) -> None:
        from transformers import CLIPModel, CLIPProcessor

        self.model = CLIPModel.from_pretrained(str(path), local_files_only=True).eval()
        self.processor = CLIPProcessor.from_pretrained(str(path), local_files_only=True)

    @property
    def dimensions(self) -> int:
        return int(self.model.config.projection_dim)

    def embed(self, image: np.ndarray) -> np.ndarray:
        """The image's unit-length CLIP embedding (failure clusters group by it)."""
        import torch

        inputs = self.processor(images=[image], return_tensors="pt")
        with torch.inference_mode():
            features = self.model.get_image_features(**inputs)
        # transformers 5 returns the vision outputs with the projection in `pooler_output`.
        vector = getattr(features, "pooler_output", features)[0]
        return (vector / vector.norm()).numpy()

    def score(self, prompt: str, image: np.ndarray) -> float:
        import torch

        inputs = self.processor(
            text=[prompt], images=[image], return_tensors="pt", padding=True, truncation=True
        )
        with torch.inference_mode():
            out = self.model(**inputs)
        text = out.text_embeds / out.text_embeds.norm(dim=-1, keepdim=True)
        picture = out.image_embeds / out.image_embeds.norm(dim=-1, keepdim=True)
        return float(max((text * picture).sum().item(), 0.0) * 100)
