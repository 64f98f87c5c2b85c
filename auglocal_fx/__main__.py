"""``python -m auglocal_fx``: the ``auglocal`` command line, as a module torchrun can start on every node::

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29400 \\
        -m auglocal_fx train resnet34_imagenet --set data.root=/data/imagenet -o runs/r34
"""
from auglocal_fx.cli.main import main

if __name__ == "__main__":
    main(prog_name="auglocal")
