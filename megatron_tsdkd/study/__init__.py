"""Method studies: a grid of training cells x seeds from one student and budget, each scored on held-out tasks,
summarised as the paper's tables (tsdkd-study, tools/study.py)."""
