"""The experiments: sweep configs, their planning into DomainBed jobs, reading runs back, model
selection and the paper's tables."""
