"""tckr_engine.export"""
