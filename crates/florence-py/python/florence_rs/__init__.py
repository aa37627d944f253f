"""Florence-2 captioning from Rust: token for token like transformers, without torch.

    import florence_rs
    model = florence_rs.Florence("microsoft/Florence-2-base")
    [record] = model.caption(["photo.jpg"], task="<MORE_DETAILED_CAPTION>")
    print(record["text"])

`florence_rs.ray.Captioner` captions Ray Data datasets (`ds.map_batches(Captioner, ...)`).
"""

from ._florence_rs import Florence, __version__

__all__ = ["Florence", "__version__"]
