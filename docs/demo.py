"""A small file to try `ahead complete` on: put the cursor at the start of median's body."""


def mean(values: list[float]) -> float:
    """The arithmetic mean of a non-empty list."""
    return sum(values) / len(values)


def median(values: list[float]) -> float:
    """The middle value of a non-empty list (the mean of the two middle ones for an even length)."""
    


def main() -> None:
    print(mean([1.0, 2.0, 4.0]), median([3.0, 1.0, 2.0]))
