"""The exported ONNX generator run with onnxruntime and numpy only (no TensorFlow): the
``Generator`` contract and the ``generate`` CLI."""
