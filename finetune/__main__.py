from finetune.commands import main

main()
