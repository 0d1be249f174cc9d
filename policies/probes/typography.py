"""Typography: does the image say what the prompt asked it to say?

For prompts that quote text ("…", '…' or “…”), the output is read by OCR and
the character error rate (CER) of the requested text is taken against the
best-matching span of what was read: edit distance with free start and end in
the read text (semi-global alignment), divided by the requested length.
Text is compared after NFKC, case folding and whitespace collapsing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import unicodedata
from functools import cached_property
from pathlib import Path
from typing import Protocol

import numpy as np

from workers.prompts import requested_text

__all__ = ["requested_text"]  # where the rule lived first; callers may import it from here


def normalize(text: str, keep_case: bool = False) -> str:
    text = unicodedata.normalize("NFKC", text)
    return " ".join((text if keep_case else text.casefold()).split())


def best_span_cer(requested: str, read: str, keep_case: bool = False) -> float:
    """Edit distance of `requested` to its best-matching span of `read`, over len(requested).

    `keep_case`: "Sale" read as "SALE" costs three edits (the case-sensitive CER, for
    brands and titles whose case is part of what was asked)."""
    want, got = normalize(requested, keep_case), normalize(read, keep_case)
    if not want:
        return 0.0
    previous = [0] * (len(got) + 1)  # a match may start anywhere in the read text
    for i, char in enumerate(want, start=1):
        current = [i] + [0] * len(got)
        for j, other in enumerate(got, start=1):
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char != other))
        previous = current
    return min(previous) / len(want)  # ...and end anywhere


class OcrEngine(Protocol):
    name: str

    def read(self, image: np.ndarray) -> str: ...


class RapidOcr:
    """rapidocr 3.x on the ONNX models bundled in its wheel (no download), one thread."""

    name = "rapidocr"

    @cached_property
    def _engine(self) -> object:
        os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
        from rapidocr import RapidOCR

        return RapidOCR(
            params={
                "Global.log_level": "error",
                "EngineConfig.onnxruntime.intra_op_num_threads": 1,
                "EngineConfig.onnxruntime.inter_op_num_threads": 1,
            }
        )

    def read(self, image: np.ndarray) -> str:
        result = self._engine(image[:, :, ::-1].copy())  # rapidocr expects BGR, as OpenCV reads
        return " ".join(result.txts or ()) if result is not None else ""


class Tesseract:
    """Debian's tesseract command line, as a second engine."""

    name = "tesseract"

    def __init__(self, binary: str = "tesseract") -> None:
        self.binary = shutil.which(binary) or binary

    def read(self, image: np.ndarray) -> str:
        from PIL import Image

        if shutil.which(self.binary) is None:
            raise FileNotFoundError(
                f"OCR engine {self.binary!r} is not on PATH: install Debian's tesseract-ocr "
                "(apt-get install tesseract-ocr) or set `ocr_engine: rapidocr` in the policy"
            )

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "in.png"
            Image.fromarray(image).save(path)
            done = subprocess.run(
                [self.binary, str(path), "stdout", "--psm", "11"],
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
                env=os.environ | {"OMP_THREAD_LIMIT": "1"},
            )
        return done.stdout


ENGINES = {"rapidocr": RapidOcr, "tesseract": Tesseract}


def word_accuracy(requested: str, read: str) -> float:
    """The share of the requested words that were read, each word used once (case-folded).

    Next to the CER because readers judge text by words: "SUMMER SALE" read as "SUMMER
    SALF" is a CER of 0.09, and one word of two wrong."""
    wanted = normalize(requested).split()
    if not wanted:
        return 1.0
    available: dict[str, int] = {}
    for word in normalize(read).split():
        available[word] = available.get(word, 0) + 1
    found = 0
    for word in wanted:
        if available.get(word, 0):
            available[word] -= 1
            found += 1
    return found / len(wanted)


class Reading:
    """One OCR read of an image, shared by every typography metric of it (OCR is the cost)."""

    def __init__(self, prompt: str, image: np.ndarray, engine: OcrEngine) -> None:
        self.wanted = requested_text(prompt)
        self._image, self._engine = image, engine
        self._read: str | None = None

    @property
    def read(self) -> str:
        if self._read is None:
            self._read = self._engine.read(self._image)
        return self._read

    def cer(self, keep_case: bool = False) -> float | None:
        """Mean CER over the quoted spans, or None when the prompt asks for no text."""
        if not self.wanted:
            return None
        return float(np.mean([best_span_cer(t, self.read, keep_case) for t in self.wanted]))

    def word_accuracy(self) -> float | None:
        if not self.wanted:
            return None
        return float(np.mean([word_accuracy(t, self.read) for t in self.wanted]))


def typography_cer(prompt: str, image: np.ndarray, engine: OcrEngine) -> float | None:
    """Mean CER over the prompt's quoted spans, or None when the prompt asks for no text."""
    return Reading(prompt, image, engine).cer()
