"""Pretrain a LIME model: `lime-hf train` as a script (`lime_hf/cli/train.py`, the pipeline `lime_hf/pretrain.py`).

One process (GPU if there is one, else CPU):

    python examples/pretrain.py data/*.txt --train-tokenizer 8000 --eval-fraction 0.05 \\
        --output-dir lime-small --max-steps 2000 --per-device-train-batch-size 16

Several processes, one model (DDP), with accelerate or torchrun; every option as above:

    accelerate launch --multi_gpu --num_processes 2 examples/pretrain.py data/*.txt ...
    torchrun --nproc_per_node 2 examples/pretrain.py data/*.txt ...

On a machine without GPUs add `--use_cpu`: the processes then train together over gloo (without it the script
stops, as each process would otherwise train its own model). The main process annotates and tokenizes first;
the others read its results from the datasets cache.
"""

from lime_hf.cli.train import main

if __name__ == "__main__":
    main()
