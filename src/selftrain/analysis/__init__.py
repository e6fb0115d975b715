"""Reports from artifacts on disk: statistics, drift reports, comparisons, plots and pages."""
