"""cpr_d2: coarse point refinement (CPR) and P2PNet for point-supervised object
localization, as a detectron2 project.

Importing the package never fails for lack of the compiled op: the point ops
fall back to their PyTorch references and say so once in the log.
"""
__version__ = "0.1.0"
