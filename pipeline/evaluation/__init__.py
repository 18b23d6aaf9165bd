"""A generator turned into numbers and pictures under one pinned yardstick (an ONNX MNIST
classifier): FID, precision/recall, class shares, plots; and the yardstick's builder."""
