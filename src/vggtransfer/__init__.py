"""vggtransfer: transfer learning with torchvision models, simple, fast and safe.

Build a pretrained model, freeze its features, give it a new head::

    import vggtransfer as vt

    model = vt.create_model("vgg16_bn")            # ImageNet weights
    vt.freeze_features(model)                       # BatchNorm statistics frozen too
    vt.replace_classifier(model, num_classes=2)     # Linear(25088, 500)-ReLU-Dropout-Linear(500, 2)
    transform = vt.imagenet_transform()             # Resize 256, CenterCrop 224, ImageNet mean/std
"""

from importlib.metadata import PackageNotFoundError, version

from ._callbacks import Callback
from ._checkpoint import LoadedModel, load_model
from ._checkpoint_file import FORMAT_VERSION, CheckpointError
from ._compare import compare_backbones
from ._comparison import Comparison
from ._distributed import is_main_process
from ._early_stopping import EarlyStopping
from ._evaluation import Evaluation, SampleResult, evaluate_samples
from ._export import EXPORT_FORMATS, EXPORT_TOLERANCE, ONNX_OPSET, Export, export
from ._freeze import BatchNormPolicy, feature_extractor, freeze_features, unfreeze_features
from ._heads import (
    HEAD_ATTRIBUTES,
    AppendedClassifier,
    append_classifier,
    find_classifier,
    replace_classifier,
)
from ._history import History
from ._images import to_rgb
from ._loggers import CSVLogger, TensorBoardLogger
from ._lr_finder import LRFinder
from ._models import WeightsNotAvailableError, cached_weights_path, classification_models, create_model
from ._predict import Prediction
from ._report import write_report
from ._spec import build_spec
from ._submission import Submission, write_kaggle_submission
from ._trainer import Trainer
from ._transforms import IMAGENET_MEAN, IMAGENET_STD, ImageTransform, imagenet_transform, unnormalize

try:
    __version__ = version("vggtransfer")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "EXPORT_FORMATS",
    "EXPORT_TOLERANCE",
    "FORMAT_VERSION",
    "HEAD_ATTRIBUTES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ONNX_OPSET",
    "AppendedClassifier",
    "BatchNormPolicy",
    "CSVLogger",
    "Callback",
    "CheckpointError",
    "Comparison",
    "EarlyStopping",
    "Evaluation",
    "Export",
    "History",
    "ImageTransform",
    "LRFinder",
    "LoadedModel",
    "Prediction",
    "SampleResult",
    "Submission",
    "TensorBoardLogger",
    "Trainer",
    "WeightsNotAvailableError",
    "__version__",
    "append_classifier",
    "build_spec",
    "cached_weights_path",
    "classification_models",
    "compare_backbones",
    "create_model",
    "evaluate_samples",
    "export",
    "feature_extractor",
    "find_classifier",
    "freeze_features",
    "imagenet_transform",
    "is_main_process",
    "load_model",
    "replace_classifier",
    "to_rgb",
    "unfreeze_features",
    "unnormalize",
    "write_kaggle_submission",
    "write_report",
]
