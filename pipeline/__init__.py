"""MNIST GAN pipeline, in packages by role (docs/architecture.md has the map):

- ``core``: what every part shares (params schema, image contract, atomic files, errors);
- ``data``: the verified MNIST download and reader;
- ``training``: TensorFlow: the nets, the GAN step, the loop, resume, the ONNX export;
- ``tracking``: MLflow runs, outage-proof logging, the team server;
- ``evaluation``: the pinned yardstick and the numbers and pictures of a generator;
- ``inference``: the ONNX generator with onnxruntime and numpy only;
- ``serve``: the HTTP service and the browser page (never imports ``training``);
- ``experiments``: presets, sweeps, comparing runs, the MLflow UI.

Importing any package is cheap and side-effect free; only ``training`` and the yardstick's
builder import TensorFlow.
"""
