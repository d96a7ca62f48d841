/** The package's entry (`import { createChatwire } from 'chatwire'`): the library's API and the types it speaks. */
export { createChatwire, type AttachOptions, type Chatwire, type ChatwireLogger, type ChatwireOptions } from './chatwire.js';
export { optionsFromEnv, OptionsError, type SettingName, type SettingOptions } from './options.js';
export { ConfigError, settings, type Config } from './config.js';
export { jwtAuthenticate, type Authenticate, type AuthenticateInput, type AuthenticateResult, type JwtAuthenticateOptions } from './auth/authenticate.js';
export type { ChatAckInfo, ChatHandle, ChatIdentity, ChatRequest, TaskMessage } from './chat-handle.js';
export type { CustomProvider, ProviderModuleOption, ProviderOption } from './llm/custom-provider.js';
export type { ModelMessage, ModelRequest, ModelResult, Provider } from './llm/provider.js';
export { AppError, type ErrorCode } from './protocol/index.js';
