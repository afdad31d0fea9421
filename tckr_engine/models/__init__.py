"""tckr_engine.models"""
