"""tckr_engine.synth"""
