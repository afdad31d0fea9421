"""tckr_engine.bench"""
