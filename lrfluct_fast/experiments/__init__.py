"""The learning-rate experiment of arXiv 2511.10435 ("Neuronal Fluctuations: Learning Rates
vs Participating Neurons"), run by `lrfluct reproduce`.

One job per module: shapes (the eight-shapes dataset), autoencoder (the models), train (the
monitored training loop and the layout of a run's results), plots (figures), report
(report.md), reproduce (the command: options, output folder, resume). This package only
uses the monitor API (lrfluct_fast.instrument or the baselines); it owns no statistics.
"""
