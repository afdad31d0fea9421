"""tckr_engine.engine"""
