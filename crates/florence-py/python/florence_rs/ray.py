"""A Ray Data captioner: `ds.map_batches(Captioner, fn_constructor_kwargs={...}, ...)`.

    import ray
    from florence_rs.ray import Captioner

    ds = ray.data.read_images("photos/", include_paths=True)          # or read_binary_files
    ds = ds.map_batches(Captioner, fn_constructor_kwargs={"model": "microsoft/Florence-2-base",
                        "task": "<MORE_DETAILED_CAPTION>", "threads": 4},
                        batch_size=8, concurrency=2, num_cpus=4)
    ds.write_parquet("captions/")

Each actor loads the model once. Every input column is kept; `caption` (the text, or a structured
task's result as JSON) and `error` (None, or why the image could not be read) are added. No row is
dropped.
"""

import json
from typing import Any, Dict, Optional

import numpy as np

from . import Florence

# Keywords of Florence(...); the other options go to caption().
_MODEL_KEYS = ("dtype", "quantize", "threads", "device", "offline")


class Captioner:
    """Callable class for `map_batches`: captions the `image` column (arrays, as
    `ray.data.read_images` makes) or the `bytes` column (encoded files, as
    `ray.data.read_binary_files` makes; decoded in Rust with EXIF orientation), or `column`."""

    def __init__(
        self,
        model: str,
        *,
        task: str = "<CAPTION>",
        text_input: Optional[str] = None,
        column: Optional[str] = None,
        **options: Any,
    ) -> None:
        model_options = {k: options.pop(k) for k in _MODEL_KEYS if k in options}
        self._model = Florence(model, **model_options)
        self._task = task
        self._text_input = text_input
        self._column = column
        self._options = options

    def _images_column(self, batch: Dict[str, Any]) -> str:
        if self._column is not None:
            if self._column not in batch:
                raise ValueError(f"column {self._column!r} is not in the dataset; it has {sorted(batch)}")
            return self._column
        for name in ("image", "bytes"):
            if name in batch:
                return name
        raise ValueError(f"no 'image' or 'bytes' column (the dataset has {sorted(batch)}); pass column=")

    def __call__(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        images = list(batch[self._images_column(batch)])
        records = self._model.caption(images, task=self._task, text_input=self._text_input, **self._options)
        captions, errors = [], []
        for record in records:
            if "error" in record:
                captions.append(None)
                errors.append(record["error"])
            elif "text" in record:
                captions.append(record["text"])
                errors.append(None)
            else:
                captions.append(json.dumps(record["result"]))
                errors.append(None)
        out = dict(batch)
        out["caption"] = np.array(captions, dtype=object)
        out["error"] = np.array(errors, dtype=object)
        return out
