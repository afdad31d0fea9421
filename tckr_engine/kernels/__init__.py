"""tckr_engine.kernels"""
