import pytest

from carvana.training.callbacks import HOOKS, Callback, CallbackList


class Recorder(Callback):
    def __init__(self):
        self.calls = []

    def on_train_start(self, trainer, start_epoch, epochs):
        self.calls.append("on_train_start")

    def on_epoch_end(self, trainer, epoch, metrics, preview):
        self.calls.append("on_epoch_end")


def test_every_hook_is_a_noop_on_the_base_class():
    cb = Callback()
    for hook in HOOKS:
        assert callable(getattr(cb, hook))
    # calling them with the documented arguments does nothing and returns None
    assert cb.on_train_start(None, 0, 1) is None
    assert cb.on_epoch_end(None, 0, {}, None) is None
    assert cb.on_predict_batch_end(None, [], None) is None
    assert cb.on_exception(None, RuntimeError()) is None


def test_misspelled_hook_in_a_subclass_fails_at_class_creation():
    with pytest.raises(TypeError, match="on_epoch_ends"):

        class Typo(Callback):
            def on_epoch_ends(self, trainer, epoch, metrics, preview):
                pass


def test_unknown_hook_on_the_list_fails_loudly():
    with pytest.raises(AttributeError, match="on_batch_end"):
        CallbackList([Callback()]).on_batch_end(None)


def test_list_dispatches_in_order_and_rejects_non_callbacks():
    a, b = Recorder(), Recorder()
    cbs = CallbackList([a, b])
    cbs.on_train_start(None, 0, 3)
    cbs.on_epoch_end(None, 0, {}, None)
    cbs.on_train_end(None)  # a no-op hook on both
    assert a.calls == b.calls == ["on_train_start", "on_epoch_end"]
    with pytest.raises(TypeError):
        CallbackList([object()])
