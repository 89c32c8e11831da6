"""Result tables: what the test results of a run are scored by."""


def score_keys(result):
    """(per-attribute key, overall key) of a result: ('mAP', 'MeanAP') or ('accuracy', 'Accuracy')."""
    return ('accuracy', 'Accuracy') if 'Accuracy' in result else ('mAP', 'MeanAP')
