"""tao-fast: Test-time Adaptive Optimization, fast.

    import tao_fast
    result = tao_fast.tune("tune.yaml")           # or a TaoConfig
    ev = tao_fast.evaluate(result.checkpoint, prompts, "arithmetic")   # greedy, eval.max_tokens
    cfg = tao_fast.load_config("tune.yaml", ["eval.samples=4"])          # the run's settings
    ev = tao_fast.evaluate(result.checkpoint, prompts, "arithmetic", cfg, sampled=True)
"""
__version__ = "0.1.0"
__all__ = ["tune", "evaluate", "load_config", "TaoConfig", "__version__"]


def __getattr__(name):  # lazy: `import tao_fast` stays cheap (no torch) for sandbox workers
    if name == "tune":
        from tao_fast.tuning import tune
        return tune
    if name == "evaluate":
        from tao_fast.eval import evaluate
        return evaluate
    if name in ("load_config", "TaoConfig"):
        from tao_fast import config
        return getattr(config, name)
    raise AttributeError(f"module 'tao_fast' has no attribute {name!r}")
