"""The config and logging set-up of a tools/ command line (detectron2's
engine/defaults.py has the same role): cpr_d2's keys with a file and overrides merged
in (errors that name the key and where it came from), the loggers to the console and
OUTPUT_DIR/log.txt, the point jsons of DATASETS.POINT_JSONS registered, the class
count resolved."""
import logging
import os
import sys

from detectron2.engine import default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from cpr_d2.config import get_cpr_d2_cfg
from cpr_d2.data import register_point_jsons
from cpr_d2.data.classes import resolve_num_classes

__all__ = ["merge_config", "setup_cfg", "setup_logging"]


def _merge(cfg, merge, source):
    try:
        merge()
    except (KeyError, AssertionError) as e:
        message = str(e).strip("'\"")
        if "Non-existent" not in message:
            raise
        raise KeyError(f"{source}: {message}. Check the spelling; cpr_d2's keys and their "
                       "meaning are in cpr_d2/config.py, detectron2's in its defaults.py") from None
    except ValueError as e:
        if "Type mismatch" not in str(e):
            raise
        raise ValueError(f"{source}: {e}; give the key a value of its default's type") from None


def merge_config(config_file, opts, source="command-line override"):
    """cpr_d2's config with `config_file` (may be empty) and the KEY VALUE list `opts`
    merged in, unfrozen; a misspelt key or a wrong type names the file or `source`."""
    cfg = get_cpr_d2_cfg()
    if config_file:
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"config file not found: {config_file}")
        _merge(cfg, lambda: cfg.merge_from_file(config_file), config_file)
    _merge(cfg, lambda: cfg.merge_from_list(opts), source)
    return cfg


# Long log lines that go to OUTPUT_DIR/log.txt only, not to the console: the
# environment, the config file and the full config (default_setup), the model.
_FILE_ONLY_PREFIXES = ("Environment info:", "Contents of args.config_file=",
                       "Running with full config:", "Model:\n")


class _FileOnly(logging.Filter):
    def filter(self, record):
        return not (isinstance(record.msg, str) and record.msg.startswith(_FILE_ONLY_PREFIXES))


def setup_logging(output_dir):
    """detectron2's, fvcore's and this package's loggers, to the console and
    `output_dir`/log.txt (detectron2's setup_logger), with the long dumps listed in
    _FILE_ONLY_PREFIXES kept off the console. Call it before default_setup: its
    setup_logger calls are cached, so default_setup gets these loggers."""
    rank = comm.get_rank()
    setup_logger(output_dir, distributed_rank=rank, name="fvcore")
    for name in (None, "cpr_d2"):
        log = setup_logger(output_dir, distributed_rank=rank) if name is None else \
            setup_logger(output_dir, distributed_rank=rank, name=name)
        for handler in log.handlers:
            # The console's handler (log.txt has a StreamHandler on the file too).
            console = getattr(handler, "stream", None) in (sys.stdout, sys.stderr)
            if console and not any(isinstance(f, _FileOnly) for f in handler.filters):
                handler.addFilter(_FileOnly())


def setup_cfg(args, output_subdir=None, training=False):
    """The config of a tools/ command line: cpr_d2's keys, the file, the overrides, then
    the class count (cpr_d2.data.classes.resolve_num_classes: from the training data
    when `training`, else from MODEL.WEIGHTS first).
    `output_subdir` puts this command's logs and config under OUTPUT_DIR/<subdir>, so
    that it does not overwrite a training run's."""
    cfg = merge_config(args.config_file, args.opts)
    if output_subdir:
        cfg.OUTPUT_DIR = os.path.join(cfg.OUTPUT_DIR, output_subdir)
    # detectron2's, fvcore's and this package's lines (the point AP table, the counting
    # threshold, what loading the data found, ...) reach the console and OUTPUT_DIR/log.txt.
    setup_logging(cfg.OUTPUT_DIR)
    register_point_jsons(cfg)
    resolve_num_classes(cfg, training=training)
    cfg.freeze()
    default_setup(cfg, args)
    return cfg
