#!/usr/bin/env python
"""Train and evaluate the CPU demo and the context probe: nonlocal_det's trainer (the repository's
``train_net.py``, same flags) with the demo's datasets, config keys and heads (``nonlocal_demo``):

    python projects/demo/train_net.py --config-file projects/demo/configs/mask_rcnn_R18_NL_demo.yaml
    python projects/demo/train_net.py --config-file projects/demo/configs/mask_rcnn_R18_NL_demo.py
    python projects/demo/train_net.py --config-file projects/demo/configs/faster_rcnn_R18_NL_probe.yaml
"""

import nonlocal_demo
from nonlocal_det.engine.train import cli

nonlocal_demo.setup()  # at import: also in each process that --num-gpus starts

if __name__ == "__main__":
    cli()
