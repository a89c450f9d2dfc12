"""`synthgen study`: does the synthetic data train classifiers, at full labels and with few labels?"""
