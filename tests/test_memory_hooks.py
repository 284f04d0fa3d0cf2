"""ReleaseMemoryHooks: freed memory is handed back after each node and each saved output (the
heavy stages run inside `DirectoryDataset.save`, after `after_node_run`)."""

from types import SimpleNamespace

from kd_pipeline import hooks, settings


def test_release_runs_after_each_node_and_each_saved_dataset(monkeypatch):
    labels = []
    monkeypatch.setattr(hooks, "release_unused_memory", labels.append)
    node = SimpleNamespace(name="teacher_logits.extract_teacher_topk")
    memory_hooks = hooks.ReleaseMemoryHooks()
    memory_hooks.after_node_run(node=node, catalog=None, inputs={}, outputs={})
    memory_hooks.after_dataset_saved(dataset_name="teacher_topk", data=None, node=node)
    assert labels == ["teacher_logits.extract_teacher_topk", "teacher_logits.extract_teacher_topk: teacher_topk saved"]


def test_the_project_registers_the_hooks():
    assert any(isinstance(hook, hooks.ReleaseMemoryHooks) for hook in settings.HOOKS)
