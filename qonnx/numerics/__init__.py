"""Pure numerics (numpy/scipy only; no onnx, no Model): quantization grids, histograms, range methods, OCTAV, metrics, the Hessian trace, the precision ILP, CLE's noise model."""
