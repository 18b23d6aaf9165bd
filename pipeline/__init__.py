"""MNIST GAN pipeline: one module per concern.

Importing this package is cheap and side-effect free; TensorFlow is imported only by the
modules that train or export (models, losses, train, metrics, export), never by
``inference`` or ``serve``.
"""
