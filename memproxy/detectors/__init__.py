"""The built-in detectors, each an ordinary plugin registered like a third party's."""
