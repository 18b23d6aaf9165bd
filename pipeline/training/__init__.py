"""Training with TensorFlow: the nets, losses and optimizers, the GAN step, where it runs
(threads, strategy), checkpoints and resume, the loop, and the export of G to ONNX."""
