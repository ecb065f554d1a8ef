"""The Table (placeholder until the replay work lands)."""


class Table:
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("Table is not built yet")
