"""A dataset mapper wrapper whose errors say which image was being loaded.

Detectron2 reads images inside the data loader, mid-training; its errors (a truncated file, an
image of another size than the annotation says, a broken annotation) do not always name the
file, and come out of a loader worker process.
"""

from typing import Any, Callable, Dict, Optional

__all__ = ["ImageLoadError", "NamedErrorsMapper"]


class ImageLoadError(RuntimeError):
    """An image (or its annotations) of a dataset could not be loaded; names the file."""


class NamedErrorsMapper:
    """Calls ``mapper(dataset_dict)``; any error is re-raised as :class:`ImageLoadError` naming
    the dataset, the image id and the file, with the original error chained.

    Args:
        mapper: e.g. Detectron2's ``DatasetMapper(cfg, is_train)``.
        dataset_name: shown in messages when known.
    """

    def __init__(self, mapper: Callable[[Dict[str, Any]], Any], dataset_name: Optional[str] = None):
        self.mapper = mapper
        self.dataset_name = dataset_name

    def __call__(self, dataset_dict: Dict[str, Any]):
        try:
            return self.mapper(dataset_dict)
        except Exception as e:
            name = f"dataset {self.dataset_name!r}, " if self.dataset_name else ""
            raise ImageLoadError(
                f"cannot load {name}image id {dataset_dict.get('image_id')!r}, file "
                f"{dataset_dict.get('file_name')}: {type(e).__name__}: {e}; fix or remove this "
                "image (or its annotations) in the dataset"
            ) from e

    def __repr__(self) -> str:
        return f"NamedErrorsMapper({self.mapper!r})"
