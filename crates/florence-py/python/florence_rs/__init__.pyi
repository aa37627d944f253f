import os
from typing import Any, Literal, Optional, Sequence, Union

import numpy as np

Image = Union[np.ndarray, bytes, bytearray, str, os.PathLike, Any]  # Any: a PIL.Image.Image

__version__: str

class Florence:
    """A Florence-2 model, loaded once (a folder or a Hugging Face id, as `florence caption --model`)."""

    def __init__(
        self,
        model: Union[str, os.PathLike],
        *,
        dtype: Literal["f32", "bf16"] = "f32",
        quantize: Optional[Literal["q8"]] = None,
        threads: Optional[int] = None,
        device: str = "cpu",
        offline: bool = False,
    ) -> None: ...
    @property
    def model(self) -> str: ...
    def caption(
        self,
        images: Sequence[Image],
        *,
        task: str = "<CAPTION>",
        text_input: Optional[str] = None,
        batch_size: Optional[int] = None,
        num_beams: Optional[int] = None,
        max_new_tokens: Optional[int] = None,
        min_new_tokens: Optional[int] = None,
        do_sample: bool = False,
        temperature: Optional[float] = None,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        min_p: Optional[float] = None,
        seed: int = 0,
    ) -> list[dict[str, Any]]:
        """One dict per image: the record `florence caption --format jsonl` prints (task, raw, ids,
        model, generation, and text or result; path for paths), or task and error for an image
        that could not be read."""
