from mamba_align.train.launch import main

main()
