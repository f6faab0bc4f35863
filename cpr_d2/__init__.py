"""cpr_d2: coarse point refinement (CPR) and P2PNet for point-supervised object
localization, as a detectron2 project.

Importing the package registers its datasets, backbone and models. It never fails for lack of the
compiled op: the point ops then fall back to their PyTorch references and say
so once in the log.
"""
__version__ = "0.1.0"

import warnings  # noqa: E402

# fvcore (imported by detectron2) scripts a loss with torch.jit.script, which torch 2.x
# deprecates with a FutureWarning on every command; nothing here uses TorchScript.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated",
                        category=FutureWarning)

from . import data  # noqa: E402,F401  (registers the datasets)
from . import modeling  # noqa: E402,F401  (registers the backbone and meta-architectures)
from .config import (  # noqa: E402,F401
    add_cpr_config,
    add_p2pnet_config,
    add_point_data_config,
    get_cpr_d2_cfg,
)
