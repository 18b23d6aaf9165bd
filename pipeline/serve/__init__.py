"""The HTTP service (FastAPI + uvicorn) and the digits page: ``python -m pipeline.serve``.
onnxruntime only: nothing here imports ``training`` or TensorFlow (tests/test_layout.py)."""
