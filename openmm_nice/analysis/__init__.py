"""Analysis of weighted samples: estimators and their errors, how far the weights can be trusted,
free-energy profiles and maps, geometric observables, MD reweighted to another state, figures."""
