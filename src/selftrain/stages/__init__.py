"""The stages of one generation: sample, critique, data, label, screen, guard, train."""
