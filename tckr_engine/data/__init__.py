"""Real datasets (Fashion-MNIST IDX, scikit-learn digits, IDX folders, image folders) and splits."""

from tckr_engine.data.datasets import (
    ImageDataset,
    class_names,
    load_dataset,
    resolve_dataset,
    train_val_split,
)

__all__ = ["ImageDataset", "class_names", "load_dataset", "resolve_dataset", "train_val_split"]
