"""MNIST itself: the four files, their checksums, the IDX reader and a verified download
from any faithful mirror. No TensorFlow."""
