"""The model zoo: attention models that read like their papers, and the trainer behind
``fastattn train`` / ``fastattn eval``.  Tasks implement :class:`fastattn.zoo.task.Task`
and are listed in :mod:`fastattn.zoo.registry`."""
