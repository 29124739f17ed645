"""Export a fine-tuned checkpoint so that it runs without this package.

`finetune export --ckpt_path CKPT --format onnx|torchscript|safetensors` (command.py). One job per
module: checkpoint.py loads the task and its preprocessing, graph.py is what the exported graph
computes, onnx.py / torchscript.py / release.py write the files, metadata.py what travels with
them, parity.py compares the file with PyTorch, runtime.py runs a file without Lightning.

Nothing is imported here, so `finetune.export.runtime` stays free of Lightning.
"""
