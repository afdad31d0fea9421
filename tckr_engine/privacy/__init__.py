"""tckr_engine.privacy"""
