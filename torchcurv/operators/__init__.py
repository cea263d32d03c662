"""Curvature operators: the torch-native contract and the matrices built on it."""
