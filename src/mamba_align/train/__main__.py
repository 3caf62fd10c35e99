from mamba_align.train.run import main

main()
