"""The authors' PyTorch checkpoints and the Hugging Face port, in and out
(docs/checkpoints.md). One module per concern, each importing only those above it:

    unwrap          a loaded object -> a flat {name: tensor}: the authors' training dict,
                    DCP's AppState, DDP / torch.compile / FSDP names undone; tensors as NumPy
    keys            the published key map and shapes; state dict <-> our parameter pytree
                    (key_map, state_dict_shapes, check_state_dict, state_dict_to_params,
                    params_to_state_dict)
    infer           the parameters' dtype and a PLDRConfig from names, shapes and dtypes
                    (infer_param_dtype, config_from_state_dict)
    safetensors_io  .safetensors files, bfloat16 included (read_safetensors, write_safetensors)
    torch_files     .pth / .pt / .bin, DCP folders, a Hugging Face folder's weights
                    (load_state_dict, save_state_dict)
    hf              the Hugging Face folder (load_hf, save_hf, hf_config, config_from_hf) and
                    load_checkpoint: any of these formats -> (config, params, g_lm)

Import the modules themselves (`from pldr_jax.compat import hf`); this package
re-exports nothing, so every name has one home."""
