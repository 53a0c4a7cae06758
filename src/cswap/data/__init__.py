"""Data layer: Fashion-MNIST, ImageFolder, splits, calibration sampling, data specs."""
