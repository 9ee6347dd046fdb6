"""Evaluation of u2s outputs: stage-1 flags (:mod:`u2s.eval.flags`) and the paper's Quality, Cheating and
Privacy metrics per method (``u2s eval``)::

    from u2s.eval.config import load_eval_config
    from u2s.eval.evaluate import run_eval

    cfg = load_eval_config({"original": {"uri": "data/images"}, "methods": {"u2s": "out/safe"},
                            "out": "out/eval"})
    result = run_eval(cfg)  # metrics.parquet, summary.json, report.html under out/eval

Modules: ``config`` (what to evaluate), ``metrics`` (the metric interface and registry), ``privacy``,
``quality``, ``cheating`` (metric families), ``detectors`` (their models), ``vlm`` (the paper's VLM
prompts), ``job`` (the Ray Data plan), ``summary``, ``report``, ``evaluate`` (end to end).
"""
