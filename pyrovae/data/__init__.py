"""Data sets: the loader registry, batching and input checks (:mod:`core`), derived MNIST sets (:mod:`derived`)
and text (:mod:`text`). Importing this package registers every data set."""

from pyrovae.data.core import (  # noqa: F401
    ArrayLike,
    BINARIZE,
    Batches,
    DATASETS,
    DEFAULT_VALID_SIZE,
    DataError,
    DataSplits,
    ENV_VAR,
    LOADERS,
    PathLike,
    RawData,
    _SPECS,
    as_inputs,
    cache_dir,
    check_data,
    from_array,
    load_dataset,
    read_binarized_mnist,
    read_idx,
    read_idx_folder,
    read_omniglot,
    register_dataset,
    register_loader,
    resolve,
)

import pyrovae.data.derived  # noqa: E402,F401  (registers color-mnist, mnist-sum, ...)
import pyrovae.data.text  # noqa: E402,F401  (registers ptb)
