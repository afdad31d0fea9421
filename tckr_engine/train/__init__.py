"""tckr_engine.train"""
